"""What a run loads without torch: the compiled graphs (runtime), the processor, the prompt layout,
the grounding parser, and what an export folder holds."""
