"""kmtrain: teacher-cached, many-documents-at-once Knowledge Module indexing."""
from .config import IndexConfig, PRESETS
from .data import Document, DocumentError, load_documents, load_questions
from .index import OutputBusyError, ask, default_steps, index

__all__ = ["IndexConfig", "PRESETS", "Document", "DocumentError", "load_documents", "load_questions", "index", "ask",
           "OutputBusyError", "default_steps"]
