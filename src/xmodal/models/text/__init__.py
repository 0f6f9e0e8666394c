"""Text towers: Hugging Face transformers encoders and the word-embedding BiGRU.

Importing this package registers ``hf``, ``bigru`` and ``multifield`` in
:data:`xmodal.models.base.TEXT_TOWERS`; transformers is imported only when an ``hf``
tower is built.
"""
from .bigru import BiGRUTextTower, load_tokenizer_json, load_word_vectors, save_tokenizer, train_tokenizer
from .hf import HFTextTower, default_text_model_path
from .multifield import MultiFieldTextTower

__all__ = ["BiGRUTextTower", "HFTextTower", "MultiFieldTextTower", "default_text_model_path",
           "load_tokenizer_json", "load_word_vectors", "save_tokenizer", "train_tokenizer"]
