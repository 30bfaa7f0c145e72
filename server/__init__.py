"""deltaserve's serving side: the HTTP app, engine and scheduler, and the CLI."""
