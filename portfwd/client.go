package portfwd

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"time"
)

// Call sends one request to an API socket the way runtimes do (write,
// half-close, read to EOF) and returns the reply.
func Call(socket string, request any) (json.RawMessage, error) {
	req, err := json.Marshal(request)
	if err != nil {
		return nil, err
	}
	c, err := net.DialTimeout("unix", socket, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("api socket %s: %w", socket, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(req); err != nil {
		return nil, fmt.Errorf("api socket %s: %w", socket, err)
	}
	_ = c.(*net.UnixConn).CloseWrite()
	b, err := io.ReadAll(io.LimitReader(c, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("api socket %s: %w", socket, err)
	}
	return b, nil
}
