"""Model definitions: the Llama decoder, its weights and tokenizers."""
