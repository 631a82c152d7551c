"""Files and requests: safetensors reading, where outputs go, the writer, the Hub session."""
