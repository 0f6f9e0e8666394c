"""Text towers: Hugging Face transformers encoders and the word-embedding BiGRU.

Importing this package registers ``hf``, ``bigru``, ``multifield`` and ``use_multilingual``
in :data:`xmodal.models.base.TEXT_TOWERS`; transformers is imported only when an ``hf``
tower is built, the USE package only when a ``use_multilingual`` tower is.
"""
from .bigru import BiGRUTextTower, load_tokenizer_json, load_word_vectors, save_tokenizer, train_tokenizer
from .hf import HFTextTower, default_text_model_path
from .multifield import MultiFieldTextTower
from .use import USETextTower

__all__ = ["BiGRUTextTower", "HFTextTower", "MultiFieldTextTower", "USETextTower", "default_text_model_path",
           "load_tokenizer_json", "load_word_vectors", "save_tokenizer", "train_tokenizer"]
