"""LoRA: PEFT adapter parsing, device slots and the model's LoRA hook."""
