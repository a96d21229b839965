"""LoRA layers, model injection, merge/unmerge and PEFT-format adapter save/load."""
