"""sparge_serve: SpargeAttn block-sparse prefill for vLLM."""
