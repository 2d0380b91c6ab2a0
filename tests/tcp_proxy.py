"""A loopback TCP proxy that can lose a client's bytes and cut its connections.

Network faults between the SDK's result watcher and the AMQP broker, made on
the wire rather than inside either party:

- :meth:`TcpProxy.lose_client_bytes`: what the client sends from now on never
  reaches the server (an acknowledgement lost with a failing link);
  :meth:`TcpProxy.lose_server_bytes`: the same the other way;
- :meth:`TcpProxy.cut`: every open connection is closed abruptly (a dropped
  link); new connections are forwarded normally again.
"""

from __future__ import annotations

import socket
import threading


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[tuple[socket.socket, socket.socket]] = []
        self._losing = False
        self._losing_server = False
        self.connections_accepted = 0
        self._stopped = False
        threading.Thread(target=self._accept, name="tcp-proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.append((client, server))
                self.connections_accepted += 1
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if self._losing if from_client else self._losing_server:
                    continue
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def lose_client_bytes(self) -> None:
        self._losing = True

    def lose_server_bytes(self) -> None:
        self._losing_server = True

    def cut(self) -> None:
        """Close every open connection at once; later connections are forwarded whole."""
        with self._lock:
            pairs, self._open = self._open, []
            for client, server in pairs:
                for end in (client, server):
                    try:
                        end.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    end.close()
            self._losing = self._losing_server = False  # only now: nothing held back may slip through the old links

    def close(self) -> None:
        self._stopped = True
        self.cut()
        self._listener.close()
