"""Does a head matter: direct logit attribution, attention knockout inside the kernel, head ablation, and ALTI token-to-token contributions."""
