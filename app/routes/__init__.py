"""The HTTP API by concern: what routes depend on (deps), /classify (classify), the text-embeddings-inference and
Hugging Face dialects (tei), and operations: /health, /info, /metrics (ops). Each route makes one call into
app.service.Service and declares the errors it can answer with."""
