"""`mdu diff`: the parameter-delta report and its formats."""
