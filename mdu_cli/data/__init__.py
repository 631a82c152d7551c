"""Records (local files and Hub datasets) and their tokenisation."""
