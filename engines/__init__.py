"""Engine builders and runtimes (CPU engine, transformers reference, TensorRT-LLM): see the engine issue."""
