"""Fine-tuning: labelled data loaded, deduplicated and split (data), the base model (base), the training loop
(loop, lora, distributed, resume), the temperature fit (calibration), evaluation and the report (evaluate), and the
`finetune` / `evaluate` commands that run them in order and export a checkpoint (pipeline)."""
