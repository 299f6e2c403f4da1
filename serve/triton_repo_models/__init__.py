"""The Python models of the TensorRT-LLM Triton repository (serve/triton_repo.py copies each as
`<model>/1/model.py`). They run inside NVIDIA's Triton container, where `triton_python_backend_utils` exists;
nothing in compactlm imports them."""
