"""Megatron-Core training and generation over megatron-interop artifacts."""
