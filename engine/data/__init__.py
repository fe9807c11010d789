"""Data layer: token shards (``indexed``, ``shards``), tokenizer, sample index (``sample_index`` + C++
``_index_cpp``), datasets (``dataset``), step loader (``loader``), and the prepare pipeline
(``text_sources``, ``tokenize_pipeline``, ``verify``) behind ``python -m engine.prepare``."""
