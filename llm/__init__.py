"""ScaleBiO for Hugging Face causal LMs: data, LISA, engines (single, DDP, FSDP2, DeepSpeed), CLI.

The loop lives in :mod:`.train` and takes every sign and scale from
``scalebio.penalty.penalty_surrogate``; see its module docstring for the order of one step.
"""
