"""RCD (Refine, Control, Distill; Xing et al., TPAMI 2026) building blocks in plain torch.

``parse``: subjects of a prompt and their token spans (offline; spaCy optional).
``losses``: the attention-control losses (RAE, RCR, RC) and feature distillation.
Never imports ComfyUI.
"""
