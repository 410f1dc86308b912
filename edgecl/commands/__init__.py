"""One module per `edgecl` subcommand (see `edgecl.cli`)."""
