"""Query-side ranking beyond FAISS: reranking and attention-based key summaries."""
