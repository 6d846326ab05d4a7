"""Each image whole, at its stored size, unresized: for a resize in torch with a model's own eval transform.

FFCV's decoders resize as they crop, always with OpenCV's INTER_AREA. A timm or torchvision
model was trained on its own eval transform, PIL's Resize with its kernel (bicubic or bilinear)
then a centre crop; resizing twice (FFCV's area, then the model's kernel) is neither. So this
decoder copies each image into the top-left corner of a batch buffer as large as the split's
largest image, and torch resizes each from its own pixels (pipeline.features.views.model_transform).
FFCV has no decoder that leaves images at their size: this one is FFCV's ResizedCropRGBImageDecoder
with the crop and the resize left out.
"""

from __future__ import annotations

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_center_crop
from ffcv.libffcv import imdecode
from ffcv.pipeline.compiler import Compiler


class WholeImageDecoder(ResizedCropRGBImageDecoder):
    """(B, height, width, 3) uint8: image ``k`` unresized at ``[k, :h, :w]``, its own stored size.

    ``(height, width)`` must hold every image of the rows read (pipeline.data.loaders.image_sizes);
    the rest of each image's slot keeps whatever an earlier batch left there.
    """

    def __init__(self, height: int, width: int):
        super().__init__((height, width))
        self.scale, self.ratio = None, 1.0

    @property
    def get_crop_generator(self):
        return get_center_crop  # FFCV's abstract property; this decoder crops nothing

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    scratch = temp_storage[dst_ix]
                    imdecode_c(image_data, scratch, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = scratch[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                destination[dst_ix, :height, :width] = image
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
