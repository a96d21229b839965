"""Task streams: offline datasets shipped in the package and loaders for user data."""
