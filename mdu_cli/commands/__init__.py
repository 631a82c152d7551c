"""One module per `mdu` command."""
