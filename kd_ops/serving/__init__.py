"""`kd-ops serve`: request and response bodies (`schemas`), what a server holds (`state`), the routes
(`app`), the Host policy (`hosts`), uvicorn (`server`), the served version (`served_model`) and the
shadow teacher (`shadow`)."""
