"""Hugging Face interop: export Trident checkpoints as transformers models and start training from them.

``mapping`` converts between Trident's full (unsharded) parameter names and layouts and transformers'
GPT2LMHeadModel / LlamaForCausalLM; ``gather`` rebuilds the full model from a checkpoint of any layout;
``load`` shards a transformers checkpoint into this rank's model (``train.init_from_hf``).
"""
