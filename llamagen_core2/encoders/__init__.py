"""What turns images and captions into model inputs and back: the VQ tokenizer (vq.py) and the T5 caption
encoder of t2i models (text.py)."""
