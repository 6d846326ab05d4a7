"""Pretraining members.

- pretrain: one member trained from its .beton, resumable bit for bit.
- plan: fixed-compute plans (CatN members, the paper's seeds) and their status.
"""
