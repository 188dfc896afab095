"""Reading files: the torch-free unpickler, its stand-ins, dtypes, tensor loading."""
