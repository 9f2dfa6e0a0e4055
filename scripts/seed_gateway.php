<?php
// The seed's WebSocket gateway, for scripts/bench --gateway (../shared/seeds):
// Workerman's websocket:// worker; each message opens an AsyncTcpConnection
// to the task port, sends one task and answers "task complete" when the
// reply comes. Our glue only: Workerman itself is a checkout given by
// WORKERMAN_DIR and COROUTINE_DIR (walkor/workerman, workerman-php/coroutine;
// neither is part of this repository).
//   GATEWAY_PORT=8091 TASK_PORT=12345 PROCESSES=1 RUN_DIR=/tmp \
//   WORKERMAN_DIR=... COROUTINE_DIR=... php scripts/seed_gateway.php start

use Workerman\Connection\AsyncTcpConnection;
use Workerman\Connection\TcpConnection;
use Workerman\Worker;

$roots = [['Workerman\\Coroutine\\', getenv('COROUTINE_DIR') . '/src/'],
          ['Workerman\\', getenv('WORKERMAN_DIR') . '/src/'],
          ['Workerman\\', getenv('COROUTINE_DIR') . '/src/']];
spl_autoload_register(function (string $class) use ($roots): void {
    foreach ($roots as [$prefix, $dir]) {
        if (strncmp($class, $prefix, strlen($prefix)) === 0) {
            $file = $dir . str_replace('\\', '/', substr($class, strlen($prefix))) . '.php';
            if (is_file($file)) {
                require $file;
                return;
            }
        }
    }
});

$port = getenv('GATEWAY_PORT');
$taskPort = getenv('TASK_PORT');
$runDir = getenv('RUN_DIR') ?: sys_get_temp_dir();
Worker::$pidFile = "$runDir/seed_gateway-$port.pid";
Worker::$logFile = "$runDir/seed_gateway-$port.log";
Worker::$stdoutFile = "$runDir/seed_gateway-$port.out";

$worker = new Worker("websocket://127.0.0.1:$port");
$worker->count = (int) (getenv('PROCESSES') ?: 1);
$worker->onMessage = function (TcpConnection $ws, $message) use ($taskPort) {
    $task = new AsyncTcpConnection("Text://127.0.0.1:$taskPort");
    $task->send(json_encode(['function' => 'echo', 'args' => [$message]]));
    $task->onMessage = function (AsyncTcpConnection $task, $result) use ($ws) {
        $task->close();
        $ws->send('task complete');
    };
    $task->connect();
};
Worker::runAll();
