"""Reading and writing: what goes to and comes from disk or the Hub.

    files.py          atomic writes with the user's umask, output-path checks
    checkpoint.py     checkpoint reading / strict validation / safetensors writing, typed config JSON
    hub.py            local path or Hub repo id -> local files (the HF cache, offline mode)
    images.py         the one pixel rule (LlamaGen's clamp(127.5 x + 128)), grids, PNG files
    run_settings.py   the settings record of a resumable run and the refusal of other settings
    shards.py         resumable, atomic, rank-split safetensors shard directories (Collect, diffuse-collect)
"""
