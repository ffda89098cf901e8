"""Models that run on the KVarN cache: a Llama/Qwen-family decoder in Flax NNX, its GGUF
loader and tokenizer, and the generation / scoring loops."""
