"""Models: loading a causal LM and naming its weights (`loading`), the built-in GGUF models
(`builtin`), the tiny random model for tests (`tiny`), and the anatomy of a decoder LM: its
decoder blocks, prunable linear layers and body/head split (`layers`)."""
