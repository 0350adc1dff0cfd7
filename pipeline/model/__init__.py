"""Load models, score completions without full logits, the reference log-probs cache."""
