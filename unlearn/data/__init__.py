"""Data: the LUME format, MMLU-format questions, pretraining corpora and the synthetic benchmark."""

from .check import check_data
from .corpus import load_corpus
from .importing import import_documents
from .lume import DataError, Document, LumeData, MiaData, Row, beside_data, load_lume, load_mia
from .mmlu import Question, load_mmlu
from .synth import synthesize

__all__ = ["DataError", "Document", "LumeData", "MiaData", "Question", "Row", "beside_data",
           "check_data", "import_documents", "load_corpus", "load_lume", "load_mia", "load_mmlu",
           "synthesize"]
