"""The prediction log: its tables and stores (`store`), the frames to the writer (`protocol`), the
server's handle (`client`), the writer process (`writer`), feedback labels (`feedback`) and window
reads (`reader`)."""
