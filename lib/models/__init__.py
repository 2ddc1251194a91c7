"""Layer 1: the analysed model — resolving a name to weights, loading it (HF, GGUF, embedded
aliases) into a TransformerLens bridge, batched greedy generation — and the feature-LLM clients
(Ollama, OpenAI, Groq, local). Imports only lib.core.
"""
