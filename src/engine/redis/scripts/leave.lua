-- Removes an entry. ARGV: id.
return forget(ARGV[1])
