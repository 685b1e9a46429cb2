"""Other formats of a checkpoint, for other loaders (formats): the Hugging Face layout (transformers, TEI, vLLM) and
ONNX (ONNX Runtime, Optimum). Exports are never inputs to serving."""
