"""Mode 3 on a replica: run a trace request's steps and analyses with torch hooks."""
