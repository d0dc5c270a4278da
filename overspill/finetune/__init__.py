"""Fine-tuning: LoRA adapters trained over a frozen base in its stored format (dense, 8/4-bit, resident or streamed).

  lora.py      the adapter: LoRA pairs per Hugging Face module, applied to overspill's fused linears through the
               loader's linear hook; PEFT's file format in and out
  data.py      training data: .txt packed into chunks, .jsonl with text or prompt/completion; checks, splits, batches
  optim.py     optimizers over the adapter's parameters (torch AdamW, blockwise 8-bit AdamW)
  backward.py  one training pass over the executor's units: forward, chunked loss, backward block by block
  trainer.py   the loop: steps, accumulation, clipping, evaluation, checkpoints and resume
  merge.py     a base Hugging Face checkpoint with an adapter merged into its weights (streamed, atomic)
"""
