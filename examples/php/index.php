<?php
// The talk's demo: a PHP app served by Apache httpd with mod_php.
header('Content-Type: text/plain');
echo "hello from php on " . (str_contains($_SERVER['SERVER_SOFTWARE'] ?? '', 'Apache') ? 'Apache httpd' : 'something else') . "\n";
