UPDATE flush SET n = n + 1 WHERE fe = 1;
