"""Banks and their documents as the API sees them: bank rows, settings, deletion and stats; reading documents and
listing blocks."""
