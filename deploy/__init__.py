"""How to run routeloop: the embedded broker, topics, the CLI and the replay."""
