"""HF Llama <-> Megatron-Core: how a HF tensor becomes a Megatron shard, and back.

- ``hf``: the name and tensor map between HF Llama and Megatron's full (TP=1) layout;
- ``layout``: how a full Megatron state dict is split over TP ranks and PP stages (and gathered);
- ``hf_io``: HF safetensors directories, read and written one tensor at a time;
- ``streaming``: writing and reading a whole ``torch_dist`` checkpoint one tensor at a time;
- ``hf_mcore``: the two converters, ``hf_to_mcore`` and ``mcore_to_hf`` (``tools/convert.py``).

The checkpoint format itself (``megatron_sega.json`` and the torch_dist files) is
``megatron_sega.checkpoint.mcore``'s; training checkpoints are ``megatron_sega.checkpoint``'s.
"""
