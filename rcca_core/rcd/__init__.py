"""RCD (Refine, Control, Distill; Xing et al., TPAMI 2026) building blocks in plain torch.

``parse``: subjects of a prompt and their token spans (offline; spaCy optional).
``losses``: the attention-control losses (RAE, RCR, RC) and feature distillation.
``refine``: token-aligned fusion of subject embeddings with single-subject ones (RCD a).
``distill``: teacher features of single-subject runs, pooled under their masks, and their cache (RCD c).
``optimize``: attention capture through ComfyUI's composable hooks and the latent gradient steps (RCD b + c).
Never imports ComfyUI.
"""
