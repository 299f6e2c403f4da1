"""compactlm: compress Hugging Face LLMs the Minitron way, build inference engines, benchmark them."""
