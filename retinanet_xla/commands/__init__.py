"""What each command does from a config to its result (train, bench, eval, data), starting its
replicas through the one launcher; ``cli.py`` only parses arguments and prints."""
