"""`mdu eval`: the likelihood estimator, ROUGE-L, the report; `benchmarks/` holds one module per benchmark."""
